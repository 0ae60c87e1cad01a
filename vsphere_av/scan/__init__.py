"""One VM's scan, whatever the file source (issue 15's ``scan`` package).

Today it holds the file sources under ``scan.sources``; the scan job itself is still the
flat ``vsphere_av.scan.job`` module until the lead moves it here.
"""
