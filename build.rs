//! Names the commit the binary was built from, for `snapgate --version`
//! (`VERGEN_GIT_SHA`, `VERGEN_GIT_DIRTY`). Outside a git checkout vergen
//! writes a placeholder and a warning; the build goes on.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let git = vergen_gitcl::GitclBuilder::default()
        .sha(true)
        .dirty(false)
        .build()?;
    vergen_gitcl::Emitter::default()
        .add_instructions(&git)?
        .emit()?;
    Ok(())
}
