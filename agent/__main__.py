from agent.cli.agentd import main

raise SystemExit(main())
