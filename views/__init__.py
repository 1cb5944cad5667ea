"""Dashboard pages (thin: read through lfp_core.store, draw with lfp_core.viz).

Not named pages/: Streamlit treats a pages/ folder beside the entry point as an automatic
multipage app, and a URL such as /overview would then run the page file directly, bypassing
app.py (its navigation and run picker).
"""
