from iisan.cli import main

raise SystemExit(main())
