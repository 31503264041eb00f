from benchmarks.variational import main

raise SystemExit(main())
