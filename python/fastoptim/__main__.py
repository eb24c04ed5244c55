from fastoptim.cli import main

raise SystemExit(main())
