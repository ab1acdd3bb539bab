"""`python -m ckptconv_ray`: runs the driver (driver.py) and exits with its status.

Owns: python/ckptconv_ray/__main__.py.
"""

import sys

from ckptconv_ray.driver import main

sys.exit(main())
