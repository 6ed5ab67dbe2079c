import sys

from fastgen_kernels.cli import main

sys.exit(main())
