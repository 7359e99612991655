import sys

from services.query.bootstrap import main

sys.exit(main())
