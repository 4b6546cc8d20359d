"""Regenerating an Azure Speech key through the Azure management API (optional extra
`speechgate[azure-mgmt]`), with the same DefaultAzureCredential as Key Vault."""

from __future__ import annotations

import re
from typing import Any

from speechgate.core.speechkeys import SpeechKeyError

_RESOURCE = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/"
    r"Microsoft\.CognitiveServices/accounts/(?P<name>[^/]+)$",
    re.IGNORECASE,
)


async def regenerate_key(resource_id: str, slot: str, **client_options: Any) -> str:
    """Regenerate `slot` of the resource and return the new key. `client_options` go to the
    management client (`base_url` for a sovereign cloud; tests point it at a local fake)."""
    match = _RESOURCE.match(resource_id)
    if match is None:
        raise SpeechKeyError(
            "--azure-resource must be /subscriptions/…/resourceGroups/…/providers/"
            "Microsoft.CognitiveServices/accounts/NAME"
        )
    try:
        from azure.identity.aio import DefaultAzureCredential
        from azure.mgmt.cognitiveservices.aio import CognitiveServicesManagementClient
    except ImportError:
        raise SpeechKeyError(
            "the management API needs `pip install speechgate[azure-mgmt]`; or regenerate the key "
            "in the portal and use --from-stdin"
        ) from None
    async with (
        DefaultAzureCredential() as credential,
        CognitiveServicesManagementClient(credential, match["sub"], **client_options) as client,
    ):
        key_name = "Key1" if slot == "key1" else "Key2"
        keys = await client.accounts.regenerate_key(match["rg"], match["name"], key_name)
    value = keys.key1 if slot == "key1" else keys.key2
    if not value:
        raise SpeechKeyError("Azure returned no key")
    return str(value)
