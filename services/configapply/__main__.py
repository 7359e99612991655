from services.configapply.bootstrap import main

raise SystemExit(main())
