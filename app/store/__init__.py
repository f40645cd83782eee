"""The SQL index, its sessions and the content-addressed blobs it points to."""
