"""Dashboard pages (thin: read through lfp_core.store, draw with lfp_core.viz)."""
