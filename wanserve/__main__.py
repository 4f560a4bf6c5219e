from wanserve.cli import main

raise SystemExit(main())
