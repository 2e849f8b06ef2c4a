from probes.bench.run import main

main()
