import sys

from services.rules.bootstrap import main

sys.exit(main())
