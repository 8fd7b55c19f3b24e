//! `aws_secrets_manager` (KeyZero: `aws`): AWS Secrets Manager `GetSecretValue` (and SSM
//! Parameter Store `GetParameter` for `ssm://` references, as KeyZero does), signed with SigV4.
//!
//! Settings: `region` (else AWS_REGION, AWS_DEFAULT_REGION), `endpoint` / `endpoint_url` (else
//! AWS_ENDPOINT_URL_SECRETS_MANAGER, AWS_ENDPOINT_URL; for moto/localstack/VPC endpoints),
//! credentials `access_key_id` + `secret_access_key` [+ `session_token`] (else the AWS_*
//! environment variables, else `profile` / AWS_PROFILE in the shared credentials file),
//! `ca_cert` an extra CA. References: `sm://NAME`, `ssm://NAME`, a bare name or an ARN; the
//! request param `secret_id` (KeyZero bundles) overrides the reference. `field` selects a key of
//! a JSON secret.

use super::http::{HttpClient, HttpResponse};
use super::settings::{self, Common};
use super::{ResolveError, Resolver, SecretRequest};
use crate::secret::Secret;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use hmac::{Hmac, Mac};
use http_body_util::Full;
use hyper::{Method, Request, Uri};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::time::SystemTime;

pub(super) const SETTINGS: &[&str] = &[
    "region",
    "endpoint",
    "endpoint_url",
    "access_key_id",
    "secret_access_key",
    "session_token",
    "profile",
    "ca_cert",
    // KeyZero's backend_to_config passes these through for every backend type.
    "address",
    "path",
    "vault",
];
const KIND: &str = "aws_secrets_manager";
const ACCESS_KEY_VAR: &str = "AWS_ACCESS_KEY_ID";
const SECRET_KEY_VAR: &str = "AWS_SECRET_ACCESS_KEY";
const SESSION_TOKEN_VAR: &str = "AWS_SESSION_TOKEN";
const PROFILE_VAR: &str = "AWS_PROFILE";
const CREDENTIALS_FILE_VAR: &str = "AWS_SHARED_CREDENTIALS_FILE";

/// Environment variables this resolver reads credentials from: the static keys, and the
/// pointers to the shared credentials file's keys (which profile, which file).
pub(super) const LOGIN_VARS: &[&str] = &[
    ACCESS_KEY_VAR,
    SECRET_KEY_VAR,
    SESSION_TOKEN_VAR,
    PROFILE_VAR,
    CREDENTIALS_FILE_VAR,
];

#[derive(Debug, Clone)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: Secret,
    pub session_token: Option<Secret>,
}

#[derive(Debug)]
pub struct AwsSecretsManagerResolver {
    region: String,
    /// Explicit endpoint (scheme://host[:port]); `None` = the public regional endpoints.
    endpoint: Option<String>,
    credentials: Credentials,
    http: HttpClient,
}

impl AwsSecretsManagerResolver {
    pub fn new(s: &Map<String, Value>, common: &Common) -> Result<Self, ResolveError> {
        let profile = settings::string(KIND, s, "profile")?.or_else(|| settings::env(PROFILE_VAR));
        let region = settings::string(KIND, s, "region")?
            .or_else(|| settings::env("AWS_REGION"))
            .or_else(|| settings::env("AWS_DEFAULT_REGION"))
            .ok_or_else(|| {
                ResolveError::MissingEnvironment(format!(
                    "{KIND}: no region: set `region` in the resolver settings or AWS_REGION"
                ))
            })?;
        if region.is_empty()
            || !region
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(settings::bad(
                KIND,
                "region",
                "is not a region name like us-east-1",
            ));
        }
        let endpoint = settings::string(KIND, s, "endpoint")?
            .or(settings::string(KIND, s, "endpoint_url")?)
            .or_else(|| settings::env("AWS_ENDPOINT_URL_SECRETS_MANAGER"))
            .or_else(|| settings::env("AWS_ENDPOINT_URL"))
            .map(|e| e.trim_end_matches('/').to_owned());
        if let Some(e) = &endpoint
            && !(e.starts_with("http://") || e.starts_with("https://"))
        {
            return Err(settings::bad(
                KIND,
                "endpoint",
                "must start with http:// or https://",
            ));
        }
        let credentials = credentials(s, profile.as_deref())?;
        let ca = settings::path(KIND, s, "ca_cert")?;
        let http = HttpClient::new(
            KIND,
            endpoint.as_deref().unwrap_or("https://"),
            ca.as_deref(),
            common.timeout,
            common.retries,
        )?;
        Ok(Self {
            region,
            endpoint,
            credentials,
            http,
        })
    }

    fn endpoint_for(&self, service: &str) -> String {
        match &self.endpoint {
            Some(e) => e.clone(),
            None => format!("https://{service}.{}.amazonaws.com", self.region),
        }
    }

    /// One signed AWS JSON-protocol call (`X-Amz-Target: TARGET`).
    async fn call(
        &self,
        reference: &str,
        service: &str,
        target: &str,
        body: &Value,
    ) -> Result<HttpResponse, ResolveError> {
        let endpoint = self.endpoint_for(service);
        let uri: Uri = format!("{endpoint}/").parse().map_err(|_| {
            ResolveError::Config(format!("{KIND}: endpoint '{endpoint}' is not a valid URL"))
        })?;
        let host = uri.authority().map(|a| a.to_string()).ok_or_else(|| {
            ResolveError::Config(format!("{KIND}: endpoint '{endpoint}' has no host"))
        })?;
        let payload = body.to_string();
        let make = || {
            let amz_date = amz_date(SystemTime::now());
            let mut headers = vec![
                (
                    "content-type".to_owned(),
                    "application/x-amz-json-1.1".to_owned(),
                ),
                ("host".to_owned(), host.clone()),
                ("x-amz-date".to_owned(), amz_date.clone()),
                ("x-amz-target".to_owned(), target.to_owned()),
            ];
            if let Some(t) = &self.credentials.session_token {
                headers.push(("x-amz-security-token".to_owned(), t.expose().to_owned()));
            }
            let auth = sign(&SigningInput {
                method: "POST",
                path: "/",
                query: "",
                headers: &headers,
                payload: payload.as_bytes(),
                region: &self.region,
                service,
                amz_date: &amz_date,
                credentials: &self.credentials,
            });
            let mut builder = Request::builder().method(Method::POST).uri(uri.clone());
            for (k, v) in headers.iter().filter(|(k, _)| k != "host") {
                builder = builder.header(k.as_str(), v.as_str());
            }
            builder
                .header("authorization", auth)
                .body(Full::new(Bytes::from(payload.clone())))
                .map_err(|_| {
                    ResolveError::Config(format!(
                        "{KIND}: the credentials contain characters not allowed in HTTP headers"
                    ))
                })
        };
        self.http
            .send(reference, make, |resp| {
                error_type(resp).is_some_and(|t| {
                    matches!(
                        t.as_str(),
                        "ThrottlingException" | "InternalServiceError" | "RequestLimitExceeded"
                    )
                })
            })
            .await
    }

    async fn lookup(&self, request: &SecretRequest) -> Result<Secret, ResolveError> {
        let reference = request.reference.as_str();
        let id = request
            .params
            .get("secret_id")
            .map(String::as_str)
            .unwrap_or(reference);
        if id.is_empty() {
            return Err(ResolveError::Backend {
                backend: KIND.into(),
                reference: reference.into(),
                message: "empty secret id".into(),
            });
        }
        if let Some(name) = id.strip_prefix("ssm://") {
            let body = serde_json::json!({ "Name": name, "WithDecryption": true });
            let resp = self
                .call(reference, "ssm", "AmazonSSM.GetParameter", &body)
                .await?;
            check(&resp, reference)?;
            let doc = resp.json().unwrap_or(Value::Null);
            let value = doc
                .pointer("/Parameter/Value")
                .and_then(Value::as_str)
                .ok_or_else(|| ResolveError::Backend {
                    backend: KIND.into(),
                    reference: reference.into(),
                    message: "SSM answered without Parameter.Value".into(),
                })?;
            return select(reference, value, request.field.as_deref());
        }
        let secret_id = id.strip_prefix("sm://").unwrap_or(id);
        let mut body = serde_json::json!({ "SecretId": secret_id });
        if let Some(stage) = request.params.get("version_stage") {
            body["VersionStage"] = Value::String(stage.clone());
        }
        let resp = self
            .call(
                reference,
                "secretsmanager",
                "secretsmanager.GetSecretValue",
                &body,
            )
            .await?;
        check(&resp, reference)?;
        let doc = resp.json().unwrap_or(Value::Null);
        match doc.get("SecretString").and_then(Value::as_str) {
            Some(value) => select(reference, value, request.field.as_deref()),
            None if doc.get("SecretBinary").is_some() => Err(ResolveError::Backend {
                backend: KIND.into(),
                reference: reference.into(),
                message: "the secret is binary (SecretBinary); only string secrets are supported"
                    .into(),
            }),
            None => Err(ResolveError::Backend {
                backend: KIND.into(),
                reference: reference.into(),
                message: "Secrets Manager answered without SecretString".into(),
            }),
        }
    }
}

fn select(reference: &str, value: &str, field: Option<&str>) -> Result<Secret, ResolveError> {
    match field {
        None => Ok(Secret::new(value)),
        Some(f) => super::file::select_json_field(KIND, reference, value, f),
    }
}

/// The `__type` of an AWS JSON error (`com.amazonaws...#ResourceNotFoundException` → the name).
fn error_type(resp: &HttpResponse) -> Option<String> {
    if resp.status.is_success() {
        return None;
    }
    let doc = resp.json()?;
    let t = doc.get("__type").and_then(Value::as_str)?;
    Some(t.rsplit('#').next().unwrap_or(t).to_owned())
}

fn check(resp: &HttpResponse, reference: &str) -> Result<(), ResolveError> {
    if resp.status.is_success() {
        return Ok(());
    }
    let kind = error_type(resp).unwrap_or_default();
    // AWS error messages name the secret and the problem, never a secret value.
    let message = resp
        .json()
        .and_then(|d| {
            d.get("message")
                .or_else(|| d.get("Message"))
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let detail = match (kind.is_empty(), message.is_empty()) {
        (true, true) => format!("AWS answered {}", resp.status),
        (false, true) => format!("{kind} ({})", resp.status),
        (true, false) => format!("{message} ({})", resp.status),
        (false, false) => format!("{kind}: {message}"),
    };
    Err(match kind.as_str() {
        "ResourceNotFoundException" | "ParameterNotFound" => ResolveError::NotFound {
            backend: KIND.into(),
            reference: reference.into(),
        },
        "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "AccessDeniedException"
        | "ExpiredTokenException"
        | "IncompleteSignature"
        | "MissingAuthenticationToken" => ResolveError::Unauthorized {
            backend: KIND.into(),
            reference: reference.into(),
            message: detail,
        },
        _ => ResolveError::Backend {
            backend: KIND.into(),
            reference: reference.into(),
            message: detail,
        },
    })
}

fn credentials(s: &Map<String, Value>, profile: Option<&str>) -> Result<Credentials, ResolveError> {
    let key = settings::string(KIND, s, "access_key_id")?;
    let secret = settings::secret(KIND, s, "secret_access_key")?;
    match (key, secret) {
        (Some(access_key_id), Some(secret_access_key)) => {
            return Ok(Credentials {
                access_key_id,
                secret_access_key,
                session_token: settings::secret(KIND, s, "session_token")?,
            });
        }
        (None, None) => {}
        _ => {
            return Err(ResolveError::Config(format!(
                "{KIND}: set both `access_key_id` and `secret_access_key`, or neither"
            )));
        }
    }
    if profile.is_none()
        && let (Some(access_key_id), Some(secret)) =
            (settings::env(ACCESS_KEY_VAR), settings::env(SECRET_KEY_VAR))
    {
        return Ok(Credentials {
            access_key_id,
            secret_access_key: Secret::new(secret),
            session_token: settings::env(SESSION_TOKEN_VAR).map(Secret::new),
        });
    }
    let profile = profile.unwrap_or("default");
    let file = settings::env(CREDENTIALS_FILE_VAR)
        .map(PathBuf::from)
        .or_else(|| settings::env("HOME").map(|h| PathBuf::from(h).join(".aws/credentials")));
    if let Some(file) = file
        && let Ok(text) = std::fs::read_to_string(&file)
    {
        let text = zeroize::Zeroizing::new(text);
        if let Some(c) = profile_credentials(&text, profile) {
            return Ok(c);
        }
    }
    Err(ResolveError::MissingEnvironment(format!(
        "{KIND}: no AWS credentials: set `access_key_id`/`secret_access_key`, the AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY environment variables, or profile '{profile}' in ~/.aws/credentials"
    )))
}

/// Static keys of `[profile]` in the shared credentials file (INI).
fn profile_credentials(text: &str, profile: &str) -> Option<Credentials> {
    let mut in_profile = false;
    let mut key = None;
    let mut secret = None;
    let mut token = None;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') && line.ends_with(']') {
            let name = line[1..line.len() - 1].trim();
            in_profile = name == profile || name.strip_prefix("profile ") == Some(profile);
            continue;
        }
        if !in_profile {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let v = v.trim().to_owned();
            match k.trim() {
                "aws_access_key_id" => key = Some(v),
                "aws_secret_access_key" => secret = Some(Secret::new(v)),
                "aws_session_token" => token = Some(Secret::new(v)),
                _ => {}
            }
        }
    }
    Some(Credentials {
        access_key_id: key?,
        secret_access_key: secret?,
        session_token: token,
    })
}

pub(crate) struct SigningInput<'a> {
    pub method: &'a str,
    /// Canonical (already URI-encoded) path.
    pub path: &'a str,
    /// Canonical query string (sorted, encoded), empty when none.
    pub query: &'a str,
    /// Lower-case header names with values; all of them are signed.
    pub headers: &'a [(String, String)],
    pub payload: &'a [u8],
    pub region: &'a str,
    pub service: &'a str,
    /// `YYYYMMDDTHHMMSSZ`, also sent as `x-amz-date`.
    pub amz_date: &'a str,
    pub credentials: &'a Credentials,
}

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    // HMAC accepts keys of any length; the error branch cannot happen.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => return Vec::new(),
    };
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

pub(crate) fn signing_key(secret: &str, date: &str, region: &str, service: &str) -> Vec<u8> {
    let k_date = hmac(format!("AWS4{secret}").as_bytes(), date.as_bytes());
    let k_region = hmac(&k_date, region.as_bytes());
    let k_service = hmac(&k_region, service.as_bytes());
    hmac(&k_service, b"aws4_request")
}

/// The SigV4 `Authorization` header value.
pub(crate) fn sign(input: &SigningInput<'_>) -> String {
    let mut headers: Vec<(String, String)> = input
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.to_ascii_lowercase(),
                v.split_whitespace().collect::<Vec<_>>().join(" "),
            )
        })
        .collect();
    headers.sort();
    let canonical_headers: String = headers.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
    let signed_headers = headers
        .iter()
        .map(|(k, _)| k.as_str())
        .collect::<Vec<_>>()
        .join(";");
    let canonical_request = format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        input.method,
        input.path,
        input.query,
        canonical_headers,
        signed_headers,
        hex::encode(Sha256::digest(input.payload))
    );
    let date = &input.amz_date[..input.amz_date.len().min(8)];
    let scope = format!("{date}/{}/{}/aws4_request", input.region, input.service);
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{}\n{scope}\n{}",
        input.amz_date,
        hex::encode(Sha256::digest(canonical_request.as_bytes()))
    );
    let key = signing_key(
        input.credentials.secret_access_key.expose(),
        date,
        input.region,
        input.service,
    );
    let signature = hex::encode(hmac(&key, string_to_sign.as_bytes()));
    format!(
        "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}",
        input.credentials.access_key_id
    )
}

/// `YYYYMMDDTHHMMSSZ` in UTC.
pub(crate) fn amz_date(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

impl Resolver for AwsSecretsManagerResolver {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn resolve<'a>(
        &'a self,
        request: &'a SecretRequest,
    ) -> BoxFuture<'a, Result<Secret, ResolveError>> {
        Box::pin(self.lookup(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const EXAMPLE_SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";

    #[test]
    fn signing_key_matches_aws_documentation() {
        // "Examples of how to derive a signing key for Signature Version 4" (AWS General Reference).
        let key = signing_key(EXAMPLE_SECRET, "20120215", "us-east-1", "iam");
        assert_eq!(
            hex::encode(key),
            "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d"
        );
    }

    #[test]
    fn signature_matches_aws_documentation_example() {
        // The IAM ListUsers example of the SigV4 documentation.
        let creds = Credentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: Secret::new(EXAMPLE_SECRET),
            session_token: None,
        };
        let headers = vec![
            (
                "content-type".to_owned(),
                "application/x-www-form-urlencoded; charset=utf-8".to_owned(),
            ),
            ("host".to_owned(), "iam.amazonaws.com".to_owned()),
            ("x-amz-date".to_owned(), "20150830T123600Z".to_owned()),
        ];
        let auth = sign(&SigningInput {
            method: "GET",
            path: "/",
            query: "Action=ListUsers&Version=2010-05-08",
            headers: &headers,
            payload: b"",
            region: "us-east-1",
            service: "iam",
            amz_date: "20150830T123600Z",
            credentials: &creds,
        });
        assert_eq!(
            auth,
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/iam/aws4_request, SignedHeaders=content-type;host;x-amz-date, Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7"
        );
    }

    #[test]
    fn amz_dates() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_440_938_160);
        assert_eq!(amz_date(t), "20150830T123600Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400); // leap day 2000
        assert_eq!(amz_date(t), "20000229T000000Z");
    }

    #[test]
    fn shared_credentials_profiles() {
        let text = "[default]\naws_access_key_id = AK1\naws_secret_access_key = S1\n\n[profile dev]\naws_access_key_id=AK2\naws_secret_access_key=S2\naws_session_token=T2\n";
        let c = profile_credentials(text, "default").unwrap();
        assert_eq!(
            (c.access_key_id.as_str(), c.secret_access_key.expose()),
            ("AK1", "S1")
        );
        let c = profile_credentials(text, "dev").unwrap();
        assert_eq!(c.session_token.unwrap().expose(), "T2");
        assert!(profile_credentials(text, "prod").is_none());
    }
}
