"""Developer and CI helper scripts for Dispatcher."""
