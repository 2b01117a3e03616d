"""`python -m toy build`: rebuild the toy world's shipped files (toy/build.py)."""
import sys

from toy.build import main

sys.exit(main())
