import sys

from load_tests.harness import main

sys.exit(main())
