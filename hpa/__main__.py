from hpa.cli import main

main()
