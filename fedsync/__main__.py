from fedsync.cli.main import main

main()
