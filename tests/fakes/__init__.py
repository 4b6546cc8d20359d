"""Local stand-ins that speak the real wire protocols over real sockets: Key Vault, Azure Speech,
an identity provider, a TLS front."""
