from abfleet.cli import main

main()
