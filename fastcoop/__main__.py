from fastcoop.cli import main

main()
