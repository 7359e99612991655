import sys

from services.portal.bootstrap import main

sys.exit(main())
