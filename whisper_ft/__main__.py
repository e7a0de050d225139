"""`python -m whisper_ft COMMAND ...` and `accelerate launch -m whisper_ft train ...`: the `whisper-ft` command."""

import sys

from whisper_ft.cli.main import main

sys.exit(main())
