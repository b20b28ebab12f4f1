//! Why a runtime app's instance did not start, and whose fault it was.

use std::path::PathBuf;

use super::CodeError;
use crate::pool::{Blame, ClaimError, StartError};
use crate::vmm::{VmId, VmmError};

/// Errors of the runtime layer. [`StartError::blame`] says whose fault
/// each is: `App` for the app's own ([`RuntimeError::App`],
/// [`RuntimeError::Code`]), `Host` for the rest.
// Variant docs say when each happens; field names say the rest.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The app did not start: the guest agent refused it (its code disk
    /// does not mount, `main` is missing), or the app exited or never
    /// answered. `output` is what the app printed, from the console.
    #[error("app {app}: {reason}{}", output_suffix(.output))]
    App {
        app: String,
        reason: String,
        output: String,
    },
    /// The app's code could not be packed into its image.
    #[error("app {app}: packing its code")]
    Code {
        app: String,
        #[source]
        source: super::CodeError,
    },
    /// The guest agent could not be reached, or failed on its side (not
    /// because of the app).
    #[error("guest agent of {vm}: {problem}")]
    Agent { vm: VmId, problem: String },
    /// The app's code could not be written into the clone's code slot.
    #[error("cannot write the app's code into {}", .path.display())]
    Attach {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A clone of a runtime image has no code slot.
    #[error("{vm} has no code slot: not a runtime image")]
    NoCodeSlot { vm: VmId },
    /// The runtime's stock gave no clone.
    #[error("runtime {runtime}: no clone")]
    Stock {
        runtime: String,
        #[source]
        source: ClaimError,
    },
    /// The clone's VM or VMM failed.
    #[error(transparent)]
    Vmm(#[from] VmmError),
}

impl StartError for RuntimeError {
    fn blame(&self) -> Blame {
        match self {
            RuntimeError::App { .. } => Blame::App,
            // What the app's code holds is the app's; a missing mke2fs or
            // a full disk is the host's.
            RuntimeError::Code {
                source:
                    CodeError::Read { .. } | CodeError::Unsupported { .. } | CodeError::TooLarge { .. },
                ..
            } => Blame::App,
            _ => Blame::Host,
        }
    }
}

fn output_suffix(output: &str) -> String {
    if output.trim().is_empty() {
        String::new()
    } else {
        format!("; app output:\n{}", output.trim_end())
    }
}
