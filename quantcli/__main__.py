from quantcli.cli.app import main

main()
