"""The lab: the bundled simulator (vcsim) and the end-to-end demo."""
