"""Running speechgate locally: `speechgate dev`, its offline stand-ins for Azure, the demo page."""
