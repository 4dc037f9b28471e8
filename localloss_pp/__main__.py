from localloss_pp.cli import main

raise SystemExit(main())
