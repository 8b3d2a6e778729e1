//! `sdctl generate`: the settings as a Job, a progress bar, the files written, a summary.

use std::time::Instant;

use crate::progress::Progress;
use crate::CliResult;

pub use crate::settings::SettingsArgs as GenerateArgs;

pub fn run(args: GenerateArgs) -> CliResult {
    let t0 = Instant::now();
    let st = crate::settings::load(&args)?;
    st.require_for_generate()?;
    let output = st.output.clone().unwrap_or_default();
    let job = &st.job;
    let loaded = sd::load(job)?;
    for r in &loaded.lora_reports {
        eprintln!("lora {r}");
    }
    for (what, why) in &loaded.embeddings_skipped {
        eprintln!("warning: embedding {what} skipped: {why}");
    }
    let t_loaded = t0.elapsed();
    let progress = Progress::new();
    let bar = progress.bar();
    let g = sd::run(&loaded, job, &st.registry, vec![Box::new(progress)])?;
    bar.finish_and_clear();
    let sampling = bar.elapsed();
    let steps_run = bar.position();

    let t_write = Instant::now();
    let paths = g.write(&output, st.save_latents.as_deref())?;
    let its = steps_run as f64 / sampling.as_secs_f64().max(1e-9);
    let controls = if job.control.is_empty() {
        String::new()
    } else {
        format!(", controls {:.1} s", g.timings.controls.as_secs_f64())
    };
    let batch = paths.len();
    eprintln!(
        "{} image{} {}x{} in {:.1} s: load {:.1} s{controls}, {} steps in {:.1} s ({:.2} it/s; text encoding included), decode {:.1} s, write {:.1} s; seed {} -> {}",
        batch,
        if batch == 1 { "" } else { "s" },
        g.width,
        g.height,
        t0.elapsed().as_secs_f64(),
        t_loaded.as_secs_f64(),
        steps_run,
        sampling.as_secs_f64(),
        its,
        g.timings.decode.as_secs_f64(),
        t_write.elapsed().as_secs_f64(),
        g.seed.map_or("(noise file)".to_string(), |s| s.to_string()),
        paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    );
    Ok(())
}
