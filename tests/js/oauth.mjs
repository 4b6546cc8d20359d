// A standard OAuth client (oauth4webapi, which openid-client is built on) against the token
// service, as an app backend on Node would use it: RFC 8414 discovery, client credentials,
// RFC 7662 introspection, RFC 7009 revocation, introspection again. Prints one JSON line.
// node oauth.mjs ISSUER CLIENT_ID CLIENT_SECRET
import * as oauth from "oauth4webapi";

const [issuerUrl, clientId, clientSecret] = process.argv.slice(2);
const issuer = new URL(issuerUrl);
const insecure = { [oauth.allowInsecureRequests]: true }; // plain http on loopback, in the tests only

const discovery = await oauth.discoveryRequest(issuer, { algorithm: "oauth2", ...insecure });
const as = await oauth.processDiscoveryResponse(issuer, discovery);
const client = { client_id: clientId };
const auth = oauth.ClientSecretBasic(clientSecret);

const granted = await oauth.clientCredentialsGrantRequest(as, client, auth, new URLSearchParams(), insecure);
const token = await oauth.processClientCredentialsResponse(as, client, granted);

const introspect = async () =>
  oauth.processIntrospectionResponse(as, client, await oauth.introspectionRequest(as, client, auth, token.access_token, insecure));
const before = await introspect();
await oauth.processRevocationResponse(await oauth.revocationRequest(as, client, auth, token.access_token, insecure));
const after = await introspect();

console.log(JSON.stringify({
  token_type: token.token_type,
  expires_in: token.expires_in,
  scope: token.scope,
  before: { active: before.active, client_id: before.client_id, sub: before.sub, scope: before.scope },
  after: { active: after.active },
}));
