"""Groups of numbers (Sinch's "Groups"): named member lists usable as batch recipients."""
