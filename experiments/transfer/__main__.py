from experiments.transfer.study import main

main()
