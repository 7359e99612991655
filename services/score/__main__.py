import sys

from services.score.bootstrap import main

sys.exit(main())
