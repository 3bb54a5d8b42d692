// A local, HelseID-like authorization server for tests and the demo. NEVER for production.
//
//   node authserver/server.mjs CONFIG.json
//
// CONFIG.json:
//   host              loopback IP literal to listen on (default "127.0.0.1"; anything else is refused)
//   port              TCP port (0 = pick a free one)
//   clients           [{client_id, jwks: {keys: [public JWKs]}, scope: "nhn:deft/api ...",
//                       registered_kids_file?: path}]
//                     registered_kids_file (tests of key rotation): a JSON file
//                     {"kids": [{"kid": "...", "from": epoch seconds}]} read at every
//                     token request; a client assertion whose kid is not listed, or is
//                     listed with a later "from", is refused with invalid_client, as
//                     HelseID refuses a key that is not (or not yet) registered. The
//                     jwks must still hold every key that may be listed (signatures are
//                     verified against it first).
//   scopes            ["nhn:deft/api", ...] every scope the server knows
//   access_token_ttl  seconds (default 300); the environment variable AUTHSERVER_ACCESS_TOKEN_TTL
//                     (seconds, a positive integer) overrides it - e.g. short-lived tokens to
//                     watch a long upload replace its token between parts
//   resource          optional resource indicator the scopes map to (default "urn:nhn:deft");
//                     it becomes the access token's `aud`
//
// Configured like HelseID (docs/helseid-profile.md, section 6): client_credentials only,
// private_key_jwt only, DPoP with server nonces always required, DPoP-bound JWT access
// tokens carrying cnf.jkt, client assertions with typ client-authentication+jwt and
// aud = issuer. When ready it prints exactly one JSON line to stdout:
//   {"issuer": "...", "port": N, "jwks_uri": "..."}
// Errors go to stderr as one JSON line each; tokens and keys are never logged.

import { generateKeyPairSync, randomBytes, randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { isIP } from 'node:net';

// oidc-provider prints its notices with console.info (stdout). Stdout carries only the
// ready line, so everything else goes to stderr.
console.log = console.error;
console.info = console.error;

const { default: Provider, errors } = await import('oidc-provider');

const ALGS = ['RS256', 'RS384', 'RS512', 'PS256', 'PS384', 'PS512', 'ES256', 'ES384', 'ES512'];
const CLIENT_ASSERTION_TYP = 'client-authentication+jwt';
// Duende IdentityServer paths, as HelseID has them; clients must read them from discovery.
const ROUTES = { token: '/connect/token', jwks: '/.well-known/openid-configuration/jwks' };
const MAX_ASSERTION_LIFETIME = 60; // seconds between iat and exp (docs/helseid-profile.md, section 2)

function logLine(obj) {
  process.stderr.write(`${JSON.stringify(obj)}\n`);
}

function fail(message) {
  logLine({ event: 'startup.error', message });
  process.exit(2);
}

function isLoopback(host) {
  if (isIP(host) === 4) return host.split('.')[0] === '127';
  if (isIP(host) === 6) return host === '::1' || host === '0:0:0:0:0:0:0:1';
  return false; // names such as "localhost" are refused: they may resolve anywhere
}

if (process.argv.length !== 3) fail('usage: node authserver/server.mjs CONFIG.json');
let config;
try {
  config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
} catch (err) {
  fail(`cannot read config: ${err.message}`);
}

const host = config.host ?? '127.0.0.1';
const port = config.port ?? 0;
const scopes = config.scopes ?? [];
const ttlFromEnv = process.env.AUTHSERVER_ACCESS_TOKEN_TTL;
if (ttlFromEnv !== undefined && !/^[1-9][0-9]*$/.test(ttlFromEnv)) {
  fail(`AUTHSERVER_ACCESS_TOKEN_TTL must be a positive integer (seconds), got ${JSON.stringify(ttlFromEnv)}`);
}
const accessTokenTTL = ttlFromEnv !== undefined ? Number(ttlFromEnv) : (config.access_token_ttl ?? 300);
const resource = config.resource ?? 'urn:nhn:deft';
if (!isLoopback(host)) fail(`host must be a loopback IP address, got ${JSON.stringify(host)}`);
if (!Number.isInteger(port) || port < 0 || port > 65535) fail('port must be an integer 0..65535');
if (!Array.isArray(scopes) || scopes.length === 0) fail('scopes must be a non-empty list');
if (!Number.isInteger(accessTokenTTL) || accessTokenTTL <= 0) fail('access_token_ttl must be a positive integer');
if (!Array.isArray(config.clients)) fail('clients must be a list');

// The provider's own access-token signing key: generated at start-up, lives only in memory.
function providerJwks() {
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  return { keys: [{ ...privateKey.export({ format: 'jwk' }), alg: 'RS256', use: 'sig', kid: randomUUID() }] };
}

const registeredKidsFiles = new Map(
  config.clients.filter((c) => c.registered_kids_file).map((c) => [c.client_id, c.registered_kids_file]),
);

// The kids HelseID accepts for a client now, when a test manages them (else null: all of jwks).
function acceptedKids(clientId) {
  const file = registeredKidsFiles.get(clientId);
  if (!file) return null;
  const now = Date.now() / 1000;
  const { kids } = JSON.parse(readFileSync(file, 'utf8'));
  return new Set(kids.filter((k) => k.from <= now).map((k) => k.kid));
}

const clients = config.clients.map((c) => ({
  client_id: c.client_id,
  jwks: c.jwks,
  scope: c.scope,
  grant_types: ['client_credentials'],
  response_types: [],
  redirect_uris: [],
  token_endpoint_auth_method: 'private_key_jwt',
  dpop_bound_access_tokens: true,
}));

let handler = (_req, res) => {
  res.statusCode = 503;
  res.end();
};
const server = createServer((req, res) => handler(req, res));
await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(port, host, resolve);
}).catch((err) => fail(`cannot listen on ${host}:${port}: ${err.message}`));

const actualPort = server.address().port;
const issuer = `http://${isIP(host) === 6 ? `[${host}]` : host}:${actualPort}`;

let provider;
try {
  provider = new Provider(issuer, {
    clients,
    jwks: providerJwks(),
    scopes,
    routes: ROUTES,
    responseTypes: [], // no authorization endpoint flows: client_credentials is the only grant
    clientAuthMethods: ['private_key_jwt'],
    enabledJWA: {
      clientAuthSigningAlgValues: ALGS,
      dPoPSigningAlgValues: ALGS,
    },
    clientBasedCORS: () => false,
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      dPoP: {
        enabled: true,
        nonceSecret: randomBytes(32),
        requireNonce: () => true,
      },
      resourceIndicators: {
        enabled: true,
        // HelseID takes a bare `scope`; map it to our single resource. Unknown scopes are refused
        // (oidc-provider would otherwise drop them silently).
        defaultResource: (ctx) => {
          for (const s of (ctx.oidc.params.scope ?? '').split(' ').filter(Boolean)) {
            if (!scopes.includes(s)) throw new errors.InvalidScope('requested scope is not allowed', s);
          }
          return resource;
        },
        getResourceServerInfo: (_ctx, indicator) => {
          if (indicator !== resource) throw new errors.InvalidTarget();
          return {
            scope: scopes.join(' '),
            accessTokenFormat: 'jwt',
            accessTokenTTL,
            jwt: { sign: { alg: 'RS256' } },
          };
        },
      },
    },
    ttl: { ClientCredentials: () => accessTokenTTL },
    // Runs after oidc-provider's own checks (sub selects the client and must match the
    // client_id parameter; alg, exp, jti, iss = client_id, aud in {issuer, token endpoint},
    // signature) and before the jti replay check, so a refused assertion spends no jti.
    async assertJwtClientAuthClaimsAndHeader(ctx, claims, header) {
      const accepted = acceptedKids(claims.sub);
      if (accepted !== null && !accepted.has(header.kid)) {
        throw new errors.InvalidClientAuth('the client assertion key is not registered for this client');
      }
      if (header.typ !== CLIENT_ASSERTION_TYP) {
        throw new errors.InvalidClientAuth(`client assertion typ must be ${CLIENT_ASSERTION_TYP}`);
      }
      // Decision: aud must be a single string equal to the issuer, as rfc7523bis asks and
      // HelseID expects. An array (even ["<issuer>"]) and the token endpoint URL are refused.
      if (claims.aud !== ctx.oidc.issuer) {
        throw new errors.InvalidClientAuth('client assertion aud must be the issuer identifier');
      }
      if (!Number.isInteger(claims.iat) || !Number.isInteger(claims.exp)
          || claims.exp - claims.iat > MAX_ASSERTION_LIFETIME) {
        throw new errors.InvalidClientAuth(
          `client assertion needs integer iat and exp, exp at most ${MAX_ASSERTION_LIFETIME}s after iat`,
        );
      }
    },
  });
} catch (err) {
  fail(`cannot configure provider: ${err.message}`);
}

function logError(event) {
  return (ctx, err) => logLine({
    event,
    error: err.error ?? err.name,
    error_description: err.error_description,
    error_detail: err.error_detail ?? (event === 'server_error' ? err.message : undefined),
    client_id: ctx.oidc?.client?.clientId,
    path: ctx.path,
  });
}
provider.on('grant.error', logError('grant.error'));
provider.on('server_error', logError('server_error'));

handler = provider.callback();

const jwksUri = new URL(ROUTES.jwks, issuer).href;
process.stdout.write(`${JSON.stringify({ issuer, port: actualPort, jwks_uri: jwksUri })}\n`);

function shutdown() {
  server.close(() => process.exit(0));
  server.closeAllConnections();
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
