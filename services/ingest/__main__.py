import sys

from services.ingest.bootstrap import main

sys.exit(main())
