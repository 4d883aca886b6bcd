"""Local servers that speak each provider's real protocol, one module per provider."""
