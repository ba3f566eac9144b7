from quantpub.cli import main

raise SystemExit(main())
