import sys

from xlstm.cli import main

sys.exit(main())
