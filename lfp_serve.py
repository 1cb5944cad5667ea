"""The dashboard as ``lfp serve`` (and so ``./lfp demo``) serves it: app.py inside an ``st.App`` whose
:class:`lfp_core.hostguard.HostGuard` refuses requests for other host names and WebSockets opened
by other sites' pages (DNS rebinding). ``streamlit run lfp_serve.py [-- --run DIR]`` finds the
``app`` below and serves it with uvicorn; every ``--server.*`` option works as for app.py.

Ships beside app.py (pyproject.toml's py-modules), so ``lfp serve`` finds it in any install.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st
from starlette.middleware import Middleware

from lfp_core.hostguard import HostGuard

app = st.App(Path(__file__).resolve().with_name("app.py"), middleware=[Middleware(HostGuard)])
