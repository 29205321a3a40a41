"""The attention-map viewer, a thin entry to the packaged app (`medssl/viewer/app.py`, what `medssl app` runs).

    streamlit run apps/attention_viewer.py -- --run RUN_DIR [--data-root DIR ...]
    python apps/attention_viewer.py RUN_DIR [--data-root DIR ...] [--port N]    # the same as `medssl app ...`
"""

from __future__ import annotations

import runpy
import sys

from streamlit import runtime

if runtime.exists():  # under `streamlit run`: this script run is the app's
    from medssl.app.session import APP_SCRIPT

    runpy.run_path(str(APP_SCRIPT), run_name="__main__")
elif __name__ == "__main__":
    from medssl.cli import main

    main(["app", *sys.argv[1:]])
