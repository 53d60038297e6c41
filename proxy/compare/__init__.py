"""Read what the proxy recorded and compare production with its shadows."""
