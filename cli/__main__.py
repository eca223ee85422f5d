from raftmail.cli.main import main

main()
