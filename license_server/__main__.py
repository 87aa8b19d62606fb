"""`python -m license_server`: the same as the `license-server` command."""

import sys

from license_server.cli import main

sys.exit(main())
