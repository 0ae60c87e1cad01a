"""Fill the appliance's OVF descriptor template (appliance.ovf.in) for one built disk.

Called by appliance/build.sh; writes the descriptor and checks it parses as XML.
"""

from __future__ import annotations

import argparse
import os
import xml.etree.ElementTree as ET
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--template", required=True, type=Path)
    parser.add_argument("--version", required=True)
    parser.add_argument("--disk", required=True, type=Path, help="the streamOptimized VMDK")
    parser.add_argument("--capacity", required=True, type=int, help="disk capacity in bytes")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    text = args.template.read_text(encoding="utf-8")
    for marker, value in (("@VERSION@", args.version), ("@DISK@", args.disk.name),
                          ("@DISK_SIZE@", str(os.path.getsize(args.disk))),
                          ("@CAPACITY@", str(args.capacity))):
        if marker not in text:
            raise SystemExit(f"{args.template}: {marker} missing")
        text = text.replace(marker, value)
    ET.fromstring(text.encode("utf-8"))
    args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
