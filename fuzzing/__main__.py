from fuzzing.harness import main

raise SystemExit(main())
