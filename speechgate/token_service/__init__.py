"""speechgate."""
