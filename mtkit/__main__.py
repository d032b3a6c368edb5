"""`python -m mtkit`: how torchrun starts each process (distributed.exit_process says why it ends so)."""
from mtkit import distributed
from mtkit.cli import main

try:
    main()
except SystemExit as e:
    distributed.exit_process(e.code)
distributed.exit_process(0)
