//! Request paths as the routers of guests may read them.
//!
//! A VM app's `on_restore` path is snapgate's to call, never a client's
//! (see [`crate::vmm::resumed::OnRestore`]). Whether a client's request
//! reaches it depends on how the guest's router reads the path, and routers
//! differ: some percent-decode before they split (`%2F` is then a `/`),
//! some take `\` for `/`, some drop `;parameters`, some fold case, and
//! URL parsers that resolve a path against a base (WHATWG `new URL(path,
//! base)` in Node.js) read a leading `//host` as an authority, not a path.
//! [`readings`] gives every reading of a path these rules allow;
//! [`reaches`] says whether any of them is the protected path.

/// The segments of `path` under one reading: percent-decoded (all of it,
/// `%2F` included, before it is split), in lower case, split on `/` and
/// `\`, with empty and `.` segments dropped, `..` applied, and `;`
/// parameters and anything after a NUL cut from each segment; the query
/// and fragment left out.
pub fn normalize(path: &str) -> Vec<Vec<u8>> {
    let path = path.split(['?', '#']).next().unwrap_or("");
    let decoded: Vec<u8> = percent_encoding::percent_decode_str(path).collect();
    let mut out: Vec<Vec<u8>> = Vec::new();
    for raw in decoded.split(|b| *b == b'/' || *b == b'\\') {
        // `;parameters`, and anything after a NUL (where C code stops).
        let segment = raw.split(|b| *b == b';' || *b == 0).next().unwrap_or(&[]);
        match segment {
            b"" | b"." => {}
            b".." => {
                out.pop();
            }
            _ => out.push(segment.to_ascii_lowercase()),
        }
    }
    out
}

/// Every reading of `path` (see the module doc): [`normalize`] of all of
/// it, and, when it starts with two of `/` and `\` (a scheme-relative
/// reference to a URL parser), of what follows the would-be authority.
pub fn readings(path: &str) -> Vec<Vec<Vec<u8>>> {
    let mut out = vec![normalize(path)];
    let bytes = path.as_bytes();
    let separator = |b: u8| b == b'/' || b == b'\\';
    if bytes.len() >= 2 && separator(bytes[0]) && separator(bytes[1]) {
        let after = &path[2..];
        let end = after.find(['/', '\\', '?', '#']).unwrap_or(after.len());
        out.push(normalize(&after[end..]));
    }
    out
}

/// Whether a client's request for `path` may reach the path whose
/// [`normalize`]d form is `protected`, under any of its [`readings`].
pub fn reaches(path: &str, protected: &[Vec<u8>]) -> bool {
    readings(path).iter().any(|r| r == protected)
}

/// Whether `path` is fit to be protected: `/`-separated segments of
/// letters, digits, `-`, `.`, `_` and `~` (RFC 3986's unreserved
/// characters), none of them `.` or `..`, and at least one. Such a path has
/// one reading, which no ordinary path of the app shares by accident.
pub fn is_plain(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    !rest.is_empty()
        && rest.split('/').all(|segment| {
            !segment.is_empty()
                && segment != "."
                && segment != ".."
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_protected_path_is_reached_however_a_client_spells_it() {
        let hook = normalize("/snapgate/resumed");
        for path in [
            "/snapgate/resumed",
            "/snapgate/resumed/",
            "//snapgate//resumed",
            "/Snapgate/RESUMED",
            "/snapgate/%72esumed",
            "/snapgate/%2e/resumed",
            "/snapgate%2Fresumed",
            "/snapgate%2fresumed",
            "/x%2F..%2Fsnapgate/resumed",
            "/snapgate%5Cresumed",
            "/snapgate\\resumed",
            "/x/../snapgate/resumed",
            "/snapgate/resumed;v=1",
            "/snapgate/resumed%00",
            "/snapgate/resumed%2f",
            "/snapgate/resumed?x=1",
            // A URL parser reads these as host `evil`, path the hook's.
            "//evil/snapgate/resumed",
            "/\\evil/snapgate/resumed",
            "\\\\evil\\snapgate\\resumed",
        ] {
            assert!(reaches(path, &hook), "{path}");
        }
        for path in [
            "/",
            "//",
            "/./",
            "/?q=1",
            "/snapgate",
            "/snapgate/resumed/x",
            "/snapgate/resumedx",
            "/%zz",
            "//evil/other",
        ] {
            assert!(!reaches(path, &hook), "{path}");
        }
    }

    #[test]
    fn only_plain_paths_may_be_protected() {
        for ok in ["/snapgate/resumed", "/a", "/a-b/c_d.e~f/", "/v1.2"] {
            assert!(is_plain(ok), "{ok}");
        }
        for bad in [
            "", "/", "//", "a", "/.", "/a/..", "/%2e", "/%2F", "/;x", "/a;b", "/a b", "/a//b",
            "/a\\b", "/é", "/a?x", "/a#x",
        ] {
            assert!(!is_plain(bad), "{bad}");
        }
    }
}
