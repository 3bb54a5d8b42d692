// An application host in Node.js that uses helseid-signer from the .proto alone: it gets a
// DPoP-bound HelseID access token (client credentials, private_key_jwt, DPoP with the
// server nonce) and makes one DPoP-protected API call. It holds no signing key: every
// client assertion and DPoP proof comes from the signer over mTLS. Node's crypto is used
// for hashing only (ath, and the RFC 7638 thumbprint check of the proof's public key).
//
//   node examples/node-host/host.mjs --signer 127.0.0.1:50051 \
//     --ca signer-ca.pem --cert client.pem --key client.key \
//     --profile deft --scope nhn:deft/api --api-url https://deft.example/api/objects/KEY/download-status
//
// Options (all but --server-name, --org-child, --org-parent and --insecure are required):
//   --signer HOST:PORT     the signer's gRPC address
//   --ca FILE              PEM: the CA that issued the signer's server certificate
//   --cert FILE, --key FILE  PEM: this host's TLS client certificate and its TLS key
//   --server-name NAME     check the server certificate for NAME instead of HOST
//   --insecure             plaintext gRPC (development listener only; no --ca/--cert/--key)
//   --profile NAME         the signer profile; --scope SCOPES the scopes to ask for
//   --api-url URL          the API URL to GET with the token (a DPoP-protected resource)
//   --org-child NNNNNNNNN, --org-parent NNNNNNNNN   organisation numbers for the assertion
//
// Prints one JSON line to stdout (never the token):
//   {"token_type", "expires_in", "scope", "cnf_jkt", "dpop_jkt", "token_requests",
//    "api_requests", "api_status", "api_body"}
// Exit status 0 when the API answered 2xx, 1 on any failure (the reason on stderr).
//
// The flow and every rule it follows are in docs/integration.md; the HelseID side in
// docs/helseid-profile.md.

import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';

const HERE = dirname(fileURLToPath(import.meta.url));
const PROTO_ROOT = join(HERE, '..', '..', 'proto');
const CLIENT_ASSERTION_TYPE = 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer';
const RPC_DEADLINE_MS = 5000; // one deadline per RPC, retries included
const HTTP_TIMEOUT_MS = 10000;

// The channel configuration the Python client uses (client/src/helseid_signer_client/signer.py,
// DEFAULT_SERVICE_CONFIG): round_robin over every resolved address, and up to 5 attempts of a
// call that failed with UNAVAILABLE or CANCELLED, backoff 0.1 s doubling to at most 1 s
// (jittered by gRPC), all within the call's one deadline. Never a retry of a refusal.
const SERVICE_CONFIG = {
  loadBalancingConfig: [{ round_robin: {} }],
  methodConfig: [{
    name: [{ service: 'helseid.signer.v1.SignerService' }],
    retryPolicy: {
      maxAttempts: 5,
      initialBackoff: '0.1s',
      maxBackoff: '1s',
      backoffMultiplier: 2,
      retryableStatusCodes: ['UNAVAILABLE', 'CANCELLED'],
    },
  }],
};

function fail(message) {
  process.stderr.write(`node-host: ${message}\n`);
  process.exit(1);
}

const { values: opt } = parseArgs({
  options: {
    signer: { type: 'string' }, ca: { type: 'string' }, cert: { type: 'string' }, key: { type: 'string' },
    'server-name': { type: 'string' }, insecure: { type: 'boolean', default: false },
    profile: { type: 'string' }, scope: { type: 'string' }, 'api-url': { type: 'string' },
    'org-child': { type: 'string', default: '' }, 'org-parent': { type: 'string', default: '' },
  },
});
for (const name of ['signer', 'profile', 'scope', 'api-url']) {
  if (!opt[name]) fail(`--${name} is required`);
}
if (!opt.insecure && !(opt.ca && opt.cert && opt.key)) fail('--ca, --cert and --key are required (or --insecure)');

// --- the gRPC client, from the .proto ------------------------------------------------------
const definition = protoLoader.loadSync('helseid/signer/v1/signer.proto', {
  includeDirs: [PROTO_ROOT],
  keepCase: true, // field names as in the .proto (issued_at, dpop_jkt, ...)
  longs: Number, // int64 seconds since the epoch fit a JS number
  enums: String,
  defaults: true, // proto3: an absent field reads as "" / 0 / empty bytes
});
const { SignerService } = grpc.loadPackageDefinition(definition).helseid.signer.v1;
const credentials = opt.insecure
  ? grpc.credentials.createInsecure()
  : grpc.credentials.createSsl(readFileSync(opt.ca), readFileSync(opt.key), readFileSync(opt.cert));
const channelOptions = { 'grpc.service_config': JSON.stringify(SERVICE_CONFIG) };
if (opt['server-name']) channelOptions['grpc.ssl_target_name_override'] = opt['server-name'];
const signer = new SignerService(opt.signer, credentials, channelOptions);

function call(method, request) {
  return new Promise((resolve, reject) => {
    signer[method](request, { deadline: Date.now() + RPC_DEADLINE_MS }, (err, response) => {
      if (err) reject(new Error(`${method}: ${grpc.status[err.code]} ${err.details}`));
      else resolve(response);
    });
  });
}

// --- JOSE helpers: decoding and hashing only, never signing --------------------------------
const b64url = (buf) => Buffer.from(buf).toString('base64url');
const sha256 = (data) => createHash('sha256').update(data).digest();
const decodePart = (jwt, index) => JSON.parse(Buffer.from(jwt.split('.')[index], 'base64url').toString('utf8'));

// RFC 7638 section 3: SHA-256 over the required members in lexicographic order, no spaces.
function thumbprint(jwk) {
  const members = { EC: ['crv', 'kty', 'x', 'y'], RSA: ['e', 'kty', 'n'], OKP: ['crv', 'kty', 'x'] }[jwk.kty];
  if (!members) throw new Error(`unsupported kty ${jwk.kty}`);
  const canonical = `{${members.map((m) => `${JSON.stringify(m)}:${JSON.stringify(jwk[m])}`).join(',')}}`;
  return b64url(sha256(Buffer.from(canonical, 'utf8')));
}

// A proof is checked before use: its header jwk must be the profile's DPoP key (GetKeySet
// never lists DPoP keys; GetClientProfile.dpop_jkt names it), with no private members.
function checkProof(proof, dpopJkt, htm) {
  const header = decodePart(proof.jwt, 0);
  const claims = decodePart(proof.jwt, 1);
  if (header.typ !== 'dpop+jwt') throw new Error(`proof typ ${header.typ}`);
  if (['d', 'p', 'q', 'dp', 'dq', 'qi'].some((m) => m in header.jwk)) throw new Error('proof jwk has private members');
  if (thumbprint(header.jwk) !== dpopJkt || proof.jkt !== dpopJkt) throw new Error('proof key is not the profile DPoP key');
  if (claims.htm !== htm || claims.htu !== proof.htu) throw new Error('proof htm/htu differ from the request');
}

async function httpSend(url, init) {
  return fetch(url, { ...init, redirect: 'manual', signal: AbortSignal.timeout(HTTP_TIMEOUT_MS) });
}

// --- 1. the profile, checked against the issuer's discovery document -----------------------
const profile = await call('GetClientProfile', { profile: opt.profile }).catch((e) => fail(e.message));
const discovery = await (await httpSend(`${profile.issuer.replace(/\/$/, '')}/.well-known/openid-configuration`, {})).json();
if (discovery.issuer !== profile.issuer || discovery.token_endpoint !== profile.token_endpoint) {
  fail(`discovery (${discovery.issuer}, ${discovery.token_endpoint}) differs from the signer profile`);
}

// --- 2. the token request: a NEW assertion and a NEW proof per attempt, one nonce retry ----
async function tokenAttempt(nonce) {
  const assertion = await call('SignClientAssertion', {
    profile: opt.profile,
    child_organization_number: opt['org-child'], // "" = absent
    parent_organization_number: opt['org-parent'],
  });
  if (assertion.kid !== profile.assertion_kid) throw new Error('assertion kid is not the profile assertion key');
  const proof = await call('SignDpopProof', {
    profile: opt.profile, htm: 'POST', htu: profile.token_endpoint, nonce: nonce ?? '', // "" = no nonce
  });
  checkProof(proof, profile.dpop_jkt, 'POST');
  const form = new URLSearchParams({
    grant_type: 'client_credentials',
    client_id: profile.client_id,
    scope: opt.scope,
    client_assertion_type: CLIENT_ASSERTION_TYPE,
    client_assertion: assertion.jwt,
  });
  return httpSend(profile.token_endpoint, { method: 'POST', body: form, headers: { DPoP: proof.jwt } });
}

let tokenRequests = 0;
let tokenNonce = null;
let tokenResponse;
let tokenBody;
try {
  for (;;) {
    tokenResponse = await tokenAttempt(tokenNonce);
    tokenRequests += 1;
    tokenBody = await tokenResponse.json().catch(() => ({}));
    const nonce = tokenResponse.headers.get('DPoP-Nonce');
    // RFC 9449 section 8: 400 use_dpop_nonce with a DPoP-Nonce header -> retry ONCE.
    if (tokenResponse.status === 400 && tokenBody.error === 'use_dpop_nonce' && nonce && tokenRequests === 1) {
      tokenNonce = nonce;
      continue;
    }
    break;
  }
} catch (e) {
  fail(e.message);
}
if (tokenResponse.status !== 200) fail(`token endpoint: HTTP ${tokenResponse.status} ${tokenBody.error}`);
if (String(tokenBody.token_type).toLowerCase() !== 'dpop') fail(`token_type ${tokenBody.token_type}, not DPoP`);
const accessToken = tokenBody.access_token;
if (typeof accessToken !== 'string' || !/^[\x20-\x7e]+$/.test(accessToken)) fail('access_token missing or not ASCII');

// --- 3. the API call: a NEW proof with ath per attempt, one nonce retry ---------------------
const apiUrl = opt['api-url'];
async function apiAttempt(nonce) {
  const proof = await call('SignDpopProof', {
    profile: opt.profile,
    htm: 'GET',
    htu: apiUrl, // the signer drops query and fragment
    nonce: nonce ?? '',
    access_token_sha256: sha256(Buffer.from(accessToken, 'ascii')), // 32 bytes; the token never goes to the signer
  });
  checkProof(proof, profile.dpop_jkt, 'GET');
  if (decodePart(proof.jwt, 1).ath !== b64url(sha256(Buffer.from(accessToken, 'ascii')))) throw new Error('proof ath');
  return httpSend(apiUrl, { method: 'GET', headers: { Authorization: `DPoP ${accessToken}`, DPoP: proof.jwt } });
}

function isNonceChallenge(response) {
  const challenge = response.headers.get('WWW-Authenticate') || '';
  return response.status === 401 && response.headers.has('DPoP-Nonce')
    && /^\s*dpop\b/i.test(challenge) && /error\s*=\s*"?use_dpop_nonce"?/i.test(challenge);
}

let apiRequests = 0;
let apiResponse;
try {
  apiResponse = await apiAttempt(null);
  apiRequests += 1;
  if (isNonceChallenge(apiResponse)) {
    apiResponse = await apiAttempt(apiResponse.headers.get('DPoP-Nonce'));
    apiRequests += 1;
  }
} catch (e) {
  fail(e.message);
}
const apiText = await apiResponse.text();
let apiBody;
try {
  apiBody = JSON.parse(apiText);
} catch {
  apiBody = apiText;
}
signer.close();

process.stdout.write(`${JSON.stringify({
  token_type: tokenBody.token_type,
  expires_in: tokenBody.expires_in,
  scope: tokenBody.scope,
  cnf_jkt: decodePart(accessToken, 1).cnf?.jkt ?? null, // decoded only; the API verifies the token
  dpop_jkt: profile.dpop_jkt,
  token_requests: tokenRequests,
  api_requests: apiRequests,
  api_status: apiResponse.status,
  api_body: apiBody,
})}\n`);
process.exit(apiResponse.ok ? 0 : 1);
