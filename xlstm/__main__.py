import sys

from xlstm.app.cli import main

sys.exit(main())
