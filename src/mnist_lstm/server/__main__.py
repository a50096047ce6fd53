import sys

from mnist_lstm.server import main

sys.exit(main())
